"""The adaptive α search: proposals (pure), the search space of a study, and its Ray Tune driver."""
