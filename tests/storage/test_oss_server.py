"""The test OSS server (tests/oss_server.py) as the oss2 SDK sees it over real HTTP: the behaviours the storage code
relies on, above all that `x-oss-forbid-overwrite` makes a write exclusive even when two writers race."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import oss2
import pytest
from oss2.models import BucketVersioningConfig, PartInfo
from oss_server import OSSServer

AUTH = oss2.Auth("test-key-id", "test-secret")
EXCLUSIVE = {"x-oss-forbid-overwrite": "true"}
PART = 100 * 1024  # the smallest part OSS accepts before the last one
_names = itertools.count(1)


@pytest.fixture
def server(oss_server: OSSServer) -> OSSServer:
    return oss_server  # conftest's, this test process's one


def open_bucket(server: OSSServer, name: str) -> oss2.Bucket:
    return oss2.Bucket(AUTH, server.endpoint, name)


@pytest.fixture
def bucket(server: OSSServer) -> oss2.Bucket:
    made = open_bucket(server, f"test-bucket-{next(_names)}")
    made.create_bucket()
    return made


def server_error(call: Callable[[], object]) -> oss2.exceptions.ServerError:
    with pytest.raises(oss2.exceptions.ServerError) as caught:
        call()
    return caught.value


def race(server: OSSServer, bucket: oss2.Bucket, write: Callable[[oss2.Bucket, bytes], object]) -> list[object]:
    """Two writers with their own connections released together; what each got (a result or an error)."""
    start = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def writer(index: int) -> None:
        own = open_bucket(server, bucket.bucket_name)
        start.wait()
        try:
            outcomes[index] = write(own, f"writer {index}".encode())
        except oss2.exceptions.OssError as error:
            outcomes[index] = error

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def assert_one_winner(outcomes: list[object], bucket: oss2.Bucket, key: str) -> None:
    losers = [outcome for outcome in outcomes if isinstance(outcome, oss2.exceptions.OssError)]
    assert len(losers) == 1 and (losers[0].status, losers[0].code) == (409, "FileAlreadyExists")
    winner = outcomes.index(next(outcome for outcome in outcomes if outcome not in losers))
    assert bucket.get_object(key).read() == f"writer {winner}".encode()


def test_a_bucket_is_created_once_and_describes_itself(server: OSSServer, bucket: oss2.Bucket) -> None:
    error = server_error(bucket.create_bucket)
    assert (error.status, error.code) == (409, "BucketAlreadyExists")
    assert bucket.get_bucket_info().name == bucket.bucket_name
    assert bucket.get_bucket_versioning().status is None


def test_put_get_head_delete_with_crc_checked(bucket: oss2.Bucket) -> None:
    data = bytes(range(256)) * 40
    put = bucket.put_object("dir/object.bin", data, headers={"x-oss-meta-purpose": "test"})  # oss2 checks its CRC
    assert put.etag == put.etag.upper() and len(put.etag) == 32
    got = bucket.get_object("dir/object.bin")
    assert got.read() == data and got.client_crc == got.server_crc == put.crc
    head = bucket.head_object("dir/object.bin")
    assert (head.content_length, head.etag, head.object_type) == (len(data), put.etag, "Normal")
    assert head.headers["x-oss-meta-purpose"] == "test"
    assert bucket.object_exists("dir/object.bin") and bucket.get_object_meta("dir/object.bin").etag == put.etag
    bucket.delete_object("dir/object.bin")
    bucket.delete_object("dir/object.bin")  # deleting what is not there is no error
    assert not bucket.object_exists("dir/object.bin")
    bucket.put_object("streamed", (chunk for chunk in [b"ab", b"cd"]))  # no length: sent chunked
    assert bucket.get_object("streamed").read() == b"abcd"


def test_ranges_as_oss_answers_them(bucket: oss2.Bucket) -> None:
    bucket.put_object("digits", b"0123456789")

    def get(first: int | None, last: int | None, standard: bool = False) -> tuple[int, bytes]:
        headers = {"x-oss-range-behavior": "standard"} if standard else None
        result = bucket.get_object("digits", byte_range=(first, last), headers=headers)
        return result.status, result.read()

    assert get(2, 4) == (206, b"234")
    assert get(7, None) == (206, b"789")
    assert get(None, 3) == (206, b"789")  # the last three bytes
    assert get(5, 20) == (200, b"0123456789")  # out of range: OSS ignores the range by default
    assert get(20, None) == (200, b"0123456789")
    assert get(5, 20, standard=True) == (206, b"56789")
    error = server_error(lambda: get(20, None, standard=True))
    assert (error.status, error.code) == (416, "InvalidRange")


def test_forbid_overwrite_refuses_a_second_put(server: OSSServer, bucket: oss2.Bucket) -> None:
    bucket.put_object("once", b"first", headers=EXCLUSIVE)
    error = server_error(lambda: bucket.put_object("once", b"second", headers=EXCLUSIVE))
    assert (error.status, error.code) == (409, "FileAlreadyExists")
    assert bucket.get_object("once").read() == b"first"
    bucket.put_object("once", b"third", headers={"x-oss-forbid-overwrite": "false"})
    assert bucket.get_object("once").read() == b"third"
    puts = [entry for entry in server.requests() if entry["method"] == "PUT" and entry["path"].endswith("/once")]
    assert [entry["headers"].get("x-oss-forbid-overwrite") for entry in puts] == ["true", "true", "false"]
    assert [entry["status"] for entry in puts] == [200, 409, 200]
    assert {entry["headers"]["authorization"] for entry in puts} == {"***"}


def test_of_two_racing_exclusive_puts_exactly_one_wins(server: OSSServer, bucket: oss2.Bucket) -> None:
    for attempt in range(20):
        key = f"raced-{attempt}"
        outcomes = race(server, bucket, lambda own, data, key=key: own.put_object(key, data, headers=EXCLUSIVE))
        assert_one_winner(outcomes, bucket, key)


def upload_in_parts(bucket: oss2.Bucket, key: str, parts: list[bytes],
                    headers: dict[str, str] | None = None) -> tuple[str, list[PartInfo]]:
    upload_id = bucket.init_multipart_upload(key, headers=headers).upload_id
    infos = []
    for number, data in enumerate(parts, 1):
        result = bucket.upload_part(key, upload_id, number, data, headers=headers)
        infos.append(PartInfo(number, result.etag, size=len(data), part_crc=result.crc))
    return upload_id, infos


def test_a_multipart_upload_joins_its_parts_and_forbid_overwrite_guards_it(bucket: oss2.Bucket) -> None:
    parts = [b"a" * PART, b"b" * PART, b"tail"]
    upload_id, infos = upload_in_parts(bucket, "big", parts, EXCLUSIVE)
    done = bucket.complete_multipart_upload("big", upload_id, infos, headers=EXCLUSIVE)  # oss2 checks the CRC
    assert done.etag.endswith("-3") and done.etag == done.etag.upper()
    assert bucket.get_object("big").read() == b"".join(parts)
    assert bucket.head_object("big").object_type == "Multipart"

    error = server_error(lambda: bucket.init_multipart_upload("big", headers=EXCLUSIVE))
    assert (error.status, error.code) == (409, "FileAlreadyExists")

    upload_id, infos = upload_in_parts(bucket, "late", [b"x"], EXCLUSIVE)
    bucket.put_object("late", b"got there first")
    error = server_error(lambda: bucket.complete_multipart_upload("late", upload_id, infos, headers=EXCLUSIVE))
    assert (error.status, error.code) == (409, "FileAlreadyExists")
    assert bucket.get_object("late").read() == b"got there first"
    assert [upload.upload_id for upload in bucket.list_multipart_uploads().upload_list] == [upload_id]
    bucket.abort_multipart_upload("late", upload_id)


def test_completing_with_a_wrong_or_small_part_is_refused(bucket: oss2.Bucket) -> None:
    upload_id, infos = upload_in_parts(bucket, "key", [b"small", b"tail"])
    error = server_error(lambda: bucket.complete_multipart_upload("key", upload_id, infos))
    assert (error.status, error.code) == (400, "EntityTooSmall")
    infos[0].etag = "0" * 32
    error = server_error(lambda: bucket.complete_multipart_upload("key", upload_id, infos))
    assert (error.status, error.code) == (400, "InvalidPart")


def test_of_two_racing_exclusive_multipart_uploads_exactly_one_wins(server: OSSServer, bucket: oss2.Bucket) -> None:
    def write(own: oss2.Bucket, data: bytes, key: str) -> object:
        upload_id, infos = upload_in_parts(own, key, [b"-" * PART, data], EXCLUSIVE)
        try:
            return own.complete_multipart_upload(key, upload_id, infos, headers=EXCLUSIVE)
        except oss2.exceptions.ServerError:
            own.abort_multipart_upload(key, upload_id)
            raise

    for attempt in range(20):
        key = f"raced-{attempt}"
        outcomes = race(server, bucket, lambda own, data, key=key: write(own, data, key))
        losers = [outcome for outcome in outcomes if isinstance(outcome, oss2.exceptions.OssError)]
        assert len(losers) == 1 and (losers[0].status, losers[0].code) == (409, "FileAlreadyExists")
        winner = outcomes.index(next(outcome for outcome in outcomes if outcome not in losers))
        assert bucket.get_object(key).read() == b"-" * PART + f"writer {winner}".encode()
    assert bucket.list_multipart_uploads().upload_list == []
    parts = [entry for entry in server.requests() if entry["method"] == "PUT" and "partNumber" in entry["query"]
             and entry["path"].startswith(f"/{bucket.bucket_name}/")]
    # a loser may have been refused at initiate time already, before sending parts
    assert len(parts) >= 40 and all(entry["headers"]["x-oss-forbid-overwrite"] == "true" for entry in parts)


def test_a_versioned_bucket_ignores_forbid_overwrite(bucket: oss2.Bucket) -> None:
    config = BucketVersioningConfig()
    config.status = oss2.BUCKET_VERSIONING_ENABLE
    bucket.put_bucket_versioning(config)
    assert bucket.get_bucket_versioning().status == "Enabled"
    bucket.put_object("kept", b"one", headers=EXCLUSIVE)
    bucket.put_object("kept", b"two", headers=EXCLUSIVE)
    assert bucket.get_object("kept").read() == b"two"
    config.status = oss2.BUCKET_VERSIONING_SUSPEND
    bucket.put_bucket_versioning(config)
    bucket.put_object("kept", b"three", headers=EXCLUSIVE)
    assert bucket.get_object("kept").read() == b"three"


def test_listing_pages_through_keys_in_order(bucket: oss2.Bucket) -> None:
    keys = sorted([f"data/{index:04d}" for index in range(250)] + ["other/x", "data/sub/one", "data/sub/two"])
    for key in keys:
        bucket.put_object(key, key.encode())
    wanted = [key for key in keys if key.startswith("data/")]
    assert [item.key for item in oss2.ObjectIterator(bucket, prefix="data/", max_keys=100)] == wanted
    assert [item.key for item in oss2.ObjectIteratorV2(bucket, prefix="data/", max_keys=100)] == wanted

    first = bucket.list_objects(prefix="data/", max_keys=100)
    assert first.is_truncated and first.next_marker == "data/0099" and len(first.object_list) == 100
    last = bucket.list_objects(prefix="data/", marker="data/0199", max_keys=100)
    assert not last.is_truncated and [item.key for item in last.object_list][-1] == "data/sub/two"

    folders = bucket.list_objects_v2(prefix="data/", delimiter="/", max_keys=1000, fetch_owner=True)
    assert folders.prefix_list == ["data/sub/"] and len(folders.object_list) == 250
    assert folders.object_list[0].owner is not None and folders.object_list[0].size == len(b"data/0000")
    paged = bucket.list_objects_v2(prefix="data/", delimiter="/", max_keys=250)
    assert paged.is_truncated and paged.object_list[-1].key == "data/0249"
    rest = bucket.list_objects_v2(prefix="data/", delimiter="/", continuation_token=paged.next_continuation_token)
    assert (rest.prefix_list, rest.object_list, rest.is_truncated) == (["data/sub/"], [], False)
    after = bucket.list_objects_v2(prefix="data/", start_after="data/0247")
    assert [item.key for item in after.object_list][:2] == ["data/0248", "data/0249"]


def test_awkward_names_survive_url_encoding(bucket: oss2.Bucket) -> None:
    keys = sorted(["a b/c d", "a+b/c+d", "ünï/cödé 😀", "plain%20"])
    for key in keys:
        bucket.put_object(key, b"x")
        assert bucket.get_object(key).read() == b"x"
    assert [item.key for item in bucket.list_objects(max_keys=2).object_list] == keys[:2]
    assert [item.key for item in oss2.ObjectIterator(bucket, max_keys=1)] == keys
    assert [item.key for item in oss2.ObjectIteratorV2(bucket, max_keys=1)] == keys
    assert bucket.list_objects_v2(delimiter="/").prefix_list == ["a b/", "a+b/", "ünï/"]


def test_multipart_uploads_are_listed_in_pages_and_aborted(bucket: oss2.Bucket) -> None:
    started = [(key, bucket.init_multipart_upload(key).upload_id) for key in ["b", "a", "c/d", "a", "c/e"]]
    listed = [(upload.key, upload.upload_id) for upload in oss2.MultipartUploadIterator(bucket, max_uploads=2)]
    assert listed == sorted(started)
    first = bucket.list_multipart_uploads(max_uploads=2)
    assert first.is_truncated and (first.next_key_marker, first.next_upload_id_marker) == sorted(started)[1]
    grouped = bucket.list_multipart_uploads(delimiter="/")
    assert grouped.prefix_list == ["c/"] and [upload.key for upload in grouped.upload_list] == ["a", "a", "b"]
    for key, upload_id in started:
        bucket.abort_multipart_upload(key, upload_id)
    assert bucket.list_multipart_uploads().upload_list == []
    error = server_error(lambda: bucket.abort_multipart_upload("a", started[1][1]))
    assert isinstance(error, oss2.exceptions.NoSuchUpload)


def test_missing_things_and_missing_credentials_are_named(server: OSSServer, bucket: oss2.Bucket) -> None:
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object("absent")
    with pytest.raises(oss2.exceptions.NotFound):
        bucket.head_object("absent")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        open_bucket(server, "no-such-bucket").put_object("key", b"x")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        open_bucket(server, "no-such-bucket").list_objects_v2()
    anonymous = oss2.Bucket(oss2.AnonymousAuth(), server.endpoint, bucket.bucket_name)
    error = server_error(lambda: anonymous.get_object("absent"))
    assert (error.status, error.code) == (403, "AccessDenied")


def test_injected_faults_answer_the_next_requests(server: OSSServer, bucket: oss2.Bucket) -> None:
    server.fail_next(1, status=503, code="ServiceUnavailable")
    error = server_error(lambda: bucket.put_object("key", b"x"))
    assert (error.status, error.code) == (503, "ServiceUnavailable")
    bucket.put_object("key", b"x")
