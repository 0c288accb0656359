"""The generated target suite: what ``zootune run`` compares methods on, and the MiniZoo's pretext
images -- all made by code or read from what installed packages ship, nothing downloaded.

- :mod:`zootune.suite.targets` -- the target tasks (:func:`~zootune.suite.targets.get_target`,
  :data:`~zootune.suite.targets.TARGETS`), generated once and cached;
- :mod:`zootune.suite.scenes`, :mod:`zootune.suite.render` -- procedural scenes and shapes;
- :mod:`zootune.suite.letters` -- the ``letters`` target's typeset letters;
- :mod:`zootune.suite.faces` -- the ``landmarks`` target's cartoon faces;
- :mod:`zootune.suite.bundled` -- images bundled with installed packages.

The user's own data goes through :mod:`zootune.data` instead.
"""
