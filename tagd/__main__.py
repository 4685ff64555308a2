import sys

from tagd.cli import main

sys.exit(main())
