"""Export of the audit trail to the hospital's monitoring: syslog over TLS (RFC 5424 /
RFC 5425) carrying each record as an IHE ATNA audit message or a FHIR AuditEvent."""
