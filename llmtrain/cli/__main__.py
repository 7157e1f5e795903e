"""`python -m llmtrain.cli`: the same as `python -m llmtrain` (it worked when the CLI was one file)."""
from llmtrain.cli import main

raise SystemExit(main())
