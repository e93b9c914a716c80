import sys

from cloud_agent.main import main

sys.exit(main())
