"""What every op shares and no user calls: backend choice (``backend``), argument checks and their exception
types (``checks``), the differentiable backward used for double backward (``grad``), and launch-time helpers
(``launch``)."""
