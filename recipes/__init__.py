"""How the models embedded in lindiff are rebuilt; not installed, run from a source checkout."""
