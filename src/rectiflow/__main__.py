from rectiflow.cli.main import main

raise SystemExit(main())
