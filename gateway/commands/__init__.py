"""Sub-command groups of ``medgw``; each module has ``register(subparsers)``.

``register`` adds its parser(s) and sets ``handler`` (a function taking the
parsed ``argparse.Namespace`` and returning the exit code) with
``parser.set_defaults(handler=...)``.  ``gateway.cli`` only wires them up.
"""
