"""The ``zootune`` command line, a thin layer over the Python API: :mod:`zootune.cli.main` (the
parser and subcommands; entry point ``zootune.cli.main:main``) and :mod:`zootune.cli.modelfile`
(the exported model folder: safetensors + config.json)."""
