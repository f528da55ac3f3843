from lmshrink.cli import main

raise SystemExit(main())
