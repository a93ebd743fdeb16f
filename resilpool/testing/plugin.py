"""pytest plugin (entry point ``pytest11``): the ``chaos`` fixture and ``--chaos-*`` options."""
