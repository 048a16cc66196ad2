# Lets the tests import the flat top-level modules (model.py, mcts.py, ...) from the repo root.
