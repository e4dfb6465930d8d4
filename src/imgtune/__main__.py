from imgtune.cli import main

raise SystemExit(main())
