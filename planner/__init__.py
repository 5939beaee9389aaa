"""ftplan planner: placeholder"""
