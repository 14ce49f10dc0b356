from lib_lora.cli import main

raise SystemExit(main())
