"""The tiny-shapes recipe: the code that trains every ``tiny-shapes*`` asset of :mod:`lindiff.assets`.

    python -m recipes.tiny_shapes.build --out lindiff/assets     # from the repository root

See README.md beside this file for the stages, their times and what was measured on the way.
"""
