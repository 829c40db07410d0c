"""The bundled recipes (YAML data, no code), installed as the package `qgl.recipes` so that
`importlib.resources.files("qgl.recipes")` finds them in a wheel and in an editable install alike."""
