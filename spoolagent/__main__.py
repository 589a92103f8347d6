from spoolagent.cli import main

raise SystemExit(main())
