"""The ``zootune`` command line, a thin layer over the Python API: :mod:`zootune.cli.main` (the
parser and subcommands; entry point ``zootune.cli.main:main``) and :mod:`zootune.cli.rl`
(``zootune rl``). The exported model folder itself is :mod:`zootune.model_dir`."""
