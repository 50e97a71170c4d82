"""One module per CLI verb beyond training: chat (REPL), predict, merge, serve, preview, estimate, launch."""
