"""The presets (one TOML file each) and the demo models they name: installed as the package data of
`capfilt.presets_data`, so that a wheel carries them (see `[tool.setuptools]` in pyproject.toml)."""
