"""HTML reports rendered from what :mod:`moescope.analysis` computed (no statistic is
computed here); figures come from :mod:`moescope.plots`."""
