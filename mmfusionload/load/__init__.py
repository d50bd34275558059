"""Load: source -> plan -> validate -> apply -> report, with presets, prefixes, repairs,
value checks, the ``load_from`` repair and the distributed read."""
