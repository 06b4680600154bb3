import sys

from batch.simulator.server import main

sys.exit(main())
