"""`python -m timerd`: the same as the `timerd` command (the worker parent starts its children
this way, with the interpreter it runs on)."""

from timerd.cli import main

main()
