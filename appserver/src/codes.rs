//! The client protocol's fixed words (docs/client-protocol.md): request
//! ops, error codes, close reasons and why an authentication failed.
//!
//! Each is an enum whose `as_str()` is what a client reads (an error
//! frame's `code`, a close frame's reason) and what labels the metrics; the
//! metric families are built from the same `LABELS`, so nothing can be sent
//! that is not counted under its own name. This module owns the words; the
//! gateway decides when each is used.

/// An enum of fixed words: `ALL`, `LABELS` (same order) and `as_str`.
macro_rules! words {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Every value's `as_str`, in the order of `ALL` (metric labels).
            pub const LABELS: &'static [&'static str] = &[$($text),+];

            /// The word clients and metrics see.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

words! {
    /// A client request's `op`. Requests with another `op` are counted as
    /// `other` and refused with [`ErrorCode::UnknownOp`].
    Op {
        Auth => "auth",
        Send => "send",
        Sync => "sync",
        Ping => "ping",
        SetStatus => "set_status",
        PresenceSubscribe => "presence_subscribe",
        Read => "read",
        ReadState => "read_state",
        Typing => "typing",
    }
}

impl Op {
    /// The op named `s`, if this server knows it.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| op.as_str() == s)
    }
}

words! {
    /// The `code` of an `error` frame. Clients branch on it.
    ErrorCode {
        AuthFailed => "auth_failed",
        AuthExpired => "auth_expired",
        AuthRequired => "auth_required",
        InvalidJson => "invalid_json",
        UnknownOp => "unknown_op",
        BinaryNotSupported => "binary_not_supported",
        BadRequest => "bad_request",
        ForgedFrom => "forged_from",
        TooLarge => "too_large",
        RateLimited => "rate_limited",
        TooSlow => "too_slow",
        UnknownUser => "unknown_user",
        UnknownGroup => "unknown_group",
        NotMember => "not_member",
        Unavailable => "unavailable",
        /// Too many connections (in all, from the client's address, or of
        /// its user).
        TooManyConnections => "too_many_connections",
        /// A presence subscription to a user who is neither a friend nor a
        /// colleague.
        NotAContact => "not_a_contact",
        /// A `req` used before for another message.
        ReqReused => "req_reused",
    }
}

words! {
    /// Why a client connection ended (the `reason` label). All but
    /// `ClientGone` are closes by the server, with [`CloseReason::code`].
    CloseReason {
        /// The client closed, or its socket failed.
        ClientGone => "client_gone",
        IdleTimeout => "idle_timeout",
        /// The server is stopping.
        GoingAway => "going_away",
        /// Its push queue overflowed.
        TooSlow => "too_slow",
        AuthenticationFailed => "authentication_failed",
        /// A valid token for a user the directory does not know.
        UnknownUser => "unknown_user",
        /// A frame over 4x the message limit.
        FrameTooLarge => "frame_too_large",
        /// The session or the chat service was unavailable.
        TryAgainLater => "try_again_later",
        /// The token the connection authenticated with expired.
        TokenExpired => "token_expired",
        /// A text frame that is not UTF-8.
        InvalidUtf8 => "invalid_utf8",
        /// Too many connections (in all, from the client's address, or of
        /// its user).
        TooManyConnections => "too_many_connections",
    }
}

impl CloseReason {
    /// The WebSocket close code (RFC 6455) the server sends; `None` when
    /// the client ended the connection.
    pub fn code(self) -> Option<u16> {
        match self {
            CloseReason::ClientGone => None,
            CloseReason::IdleTimeout => Some(1000),
            CloseReason::GoingAway => Some(1001),
            CloseReason::AuthenticationFailed | CloseReason::UnknownUser => Some(1008),
            CloseReason::FrameTooLarge => Some(1009),
            CloseReason::TooSlow | CloseReason::TryAgainLater => Some(1013),
            CloseReason::InvalidUtf8 => Some(1007),
            CloseReason::TokenExpired => Some(4001),
            CloseReason::TooManyConnections => Some(4008),
        }
    }

    /// The close frame's reason text: the label with spaces.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::ClientGone => "client gone",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::GoingAway => "going away",
            CloseReason::TooSlow => "too slow",
            CloseReason::AuthenticationFailed => "authentication failed",
            CloseReason::UnknownUser => "unknown user",
            CloseReason::FrameTooLarge => "frame too large",
            CloseReason::TryAgainLater => "try again later",
            CloseReason::TokenExpired => "token expired",
            CloseReason::InvalidUtf8 => "invalid utf8",
            CloseReason::TooManyConnections => "too many connections",
        }
    }
}

words! {
    /// Why a client's authentication was refused (the `reason` label).
    AuthFailure {
        /// A bad signature, a malformed token, a bad `device`.
        Invalid => "invalid",
        Expired => "expired",
        /// No token, or an empty one.
        Missing => "missing",
        /// The first frame was not an `auth`.
        NotFirst => "not_first",
        /// No `auth` within the auth timeout.
        Timeout => "timeout",
        UnknownUser => "unknown_user",
    }
}

words! {
    /// Why an admin API call was refused (the `reason` label).
    AdminRefusal {
        /// No `Authorization: Bearer` header.
        NoToken => "no_token",
        /// A bearer token that is not the configured one.
        BadToken => "bad_token",
        /// A `Host` header naming neither the listener nor an allowed name.
        BadHost => "bad_host",
        /// A `from` the admin API may not send as.
        BadFrom => "bad_from",
    }
}

words! {
    /// Why a client connection was refused or dropped by the gateway's
    /// limits (the `reason` label).
    ConnLimit {
        /// `limits.max_connections` reached.
        Total => "total",
        /// `limits.max_connections_per_ip` reached.
        PerIp => "per_ip",
        /// `limits.max_connections_per_user` reached (after `auth`).
        PerUser => "per_user",
        /// The upgrade did not finish within `limits.handshake_timeout_ms`.
        HandshakeTimeout => "handshake_timeout",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_words_in_order() {
        fn check<T: Copy + std::fmt::Display>(
            all: &[T],
            labels: &[&str],
            s: fn(T) -> &'static str,
        ) {
            assert_eq!(all.len(), labels.len());
            for (v, l) in all.iter().zip(labels) {
                assert_eq!(s(*v), *l);
                assert_eq!(v.to_string(), *l);
            }
        }
        check(Op::ALL, Op::LABELS, Op::as_str);
        check(ErrorCode::ALL, ErrorCode::LABELS, ErrorCode::as_str);
        check(CloseReason::ALL, CloseReason::LABELS, CloseReason::as_str);
        check(AuthFailure::ALL, AuthFailure::LABELS, AuthFailure::as_str);
        check(
            AdminRefusal::ALL,
            AdminRefusal::LABELS,
            AdminRefusal::as_str,
        );
        for r in CloseReason::ALL {
            assert_eq!(r.text().replace(' ', "_"), r.as_str());
        }
        assert_eq!(Op::parse("set_status"), Some(Op::SetStatus));
        assert_eq!(Op::parse("teleport"), None);
    }
}
