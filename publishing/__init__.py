"""Publishing: destinations, publications and schedules."""
