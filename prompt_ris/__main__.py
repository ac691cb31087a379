"""``python -m prompt_ris``: the ``prompt-ris`` command line (see ``prompt_ris.cli``)."""

from prompt_ris.cli import main

raise SystemExit(main())
