import sys

from kvwire.edge_agent.main import main

sys.exit(main())
