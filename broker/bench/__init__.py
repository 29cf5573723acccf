"""``broker bench``: calibration jobs (``run``, ``measure``), the arithmetic (``model``), tables and plots
(``report``)."""
