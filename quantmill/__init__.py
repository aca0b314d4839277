"""quantmill's command line (thin: parses, calls flows or quant, prints)."""
