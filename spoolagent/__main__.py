from spoolagent.cli.commands import main

raise SystemExit(main())
