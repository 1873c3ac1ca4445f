"""``python -m smcgen`` runs the main job."""

from smcgen.cli import main

raise SystemExit(main())
