import sys

from qcompile.tools.cli import main

sys.exit(main())
