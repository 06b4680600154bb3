"""Where the job's files live. `base` is the storage seam: whole objects on string keys under a root, in the
terms an object store offers (`open_read`, an exclusive `create`, a whole-object `replace` with an optional
compare-and-swap, `list`, `delete`; no rename, append or mtime). `local` keeps a folder as durable as the
checkpoint needs, `memory` holds objects in memory and fails the calls a test names. `atomic` is the whole-file
write of a local file (temp file, fsync, rename, fsync the folder). A leaf: imports nothing of batch's but
`errors`.
"""
