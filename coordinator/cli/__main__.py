import sys

from coordinator.cli.commands import main

sys.exit(main())
