"""tadsr.export"""
