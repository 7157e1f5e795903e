from llmtrain.cli import main

raise SystemExit(main())
