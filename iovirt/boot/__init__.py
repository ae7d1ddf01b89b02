"""Linux boot protocol, e820 and platform tables (the Linux boot issue)."""
