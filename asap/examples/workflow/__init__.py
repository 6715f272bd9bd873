"""The three skills of the ``multi_step_workflow`` example, one module per agent."""
