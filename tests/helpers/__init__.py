"""What several test modules share: a test imports its helpers from here, never from
another test module (whose tests would then be collected twice, and whose fixtures and
constants would change under the tests that borrow them)."""
