"""What runs inside an engine process: the API client, the runner, the handler registry
and the built-in handlers. No Django models: an engine may run on another machine."""
