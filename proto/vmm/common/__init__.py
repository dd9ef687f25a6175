"""Code the controller and the agent share: structured logging and settings loading."""
