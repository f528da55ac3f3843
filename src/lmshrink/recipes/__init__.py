"""The commands: one module per workflow (`lmshrink COMMAND` runs `recipes/COMMAND.py`'s `run`).

A recipe reads its settings, then composes the library (`lmshrink.*`): it loads models, prepares
data, calls the maths and writes one self-describing output folder. Recipes may call other
recipes' `run` (the demo does); the library never imports a recipe.
"""
