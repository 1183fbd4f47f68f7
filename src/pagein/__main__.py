import sys

from pagein.cli.main import main

sys.exit(main())
