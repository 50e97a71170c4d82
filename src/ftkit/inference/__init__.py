"""The inference core: load a finished run and generate with its template and stop tokens.

chat (the REPL), predict, serve, merge and training's before/after samples all go through it."""
