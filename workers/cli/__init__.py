"""The commands that load weights (run, make-model, serve, shm), added to `hmoe` by hmoe.runtime.cli."""
