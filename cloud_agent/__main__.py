import sys

from kvwire.cloud_agent.main import main

sys.exit(main())
