from fastseg3d.cli import main

raise SystemExit(main())
