"""Transfer methods. One file (or folder) per method; see ``zootune.methods.base`` for what a method
gives the training engine and ``zootune.methods.registry`` for the names the CLI knows."""
