"""The command line: every entry point, its argv and `@hydra.main`, exit codes and the
"carry on with ..." hints. Nothing in the runner imports this layer."""
