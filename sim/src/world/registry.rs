//! A model of the registry's `servers` table, answering the cores'
//! questions late, with errors, from a stale copy, or not at all.

use super::*;

/// The longest a registry answer takes while the registry is slow.
pub(super) const SLOWEST_ANSWER_MS: u64 = 4_000;

impl World {
    pub(super) fn registry_delay(&mut self) -> Duration {
        match self.reg_mode {
            RegMode::Slow => self.rng.millis(300, SLOWEST_ANSWER_MS),
            _ => self.rng.millis(1, 15),
        }
    }

    /// A mark-down of `server`'s incarnation `epoch` is a broken promise
    /// when that incarnation still lives and was given the rejoin lease by
    /// the running exchange with nothing since to excuse a late return:
    /// its clients would lose their sessions although nothing failed.
    fn spurious_mark_down(&mut self, x: usize, server: ServerId, epoch: u64) {
        let Some(r) = self.exs[x].rejoining.get(&server).copied() else {
            return;
        };
        let alive = self.apps.iter().any(|a| {
            a.id == server
                && a.inc
                    .as_ref()
                    .is_some_and(|i| i.link.config().epoch == epoch && !i.link.is_stopped())
        });
        if r.epoch == epoch && !r.excused && alive {
            self.fail(format!(
                "server {server} (epoch {epoch}) was marked down by the restarted exchange \
                 although it lived, reachable, with the registry healthy"
            ));
        }
    }

    pub(super) fn ask_registry(&mut self, x: usize, life: u64, id: AskId, query: Query) {
        let d = self.registry_delay();
        if self.rng.chance(self.p.registry_drop) {
            // The answer is lost; the change may still have been made.
            if self.rng.chance(0.5) {
                let _ = self.registry_answer(x, query);
            }
            return;
        }
        self.schedule(d, Ev::ExAnswer { x, life, id, query });
    }

    /// Carry out exchange `x`'s `query` on the model of the `servers`
    /// table.
    pub(super) fn registry_answer(&mut self, x: usize, query: Query) -> Answer {
        let me = self.exs[x].id;
        let failing = self.reg_mode == RegMode::Failing && self.rng.chance(0.7);
        let fail = || RegistryFailure("registry unavailable (simulated)".into());
        match query {
            Query::RecordRegistration { server, epoch } => {
                if failing {
                    return Answer::Registration(Err(fail()));
                }
                // The registration is a write transaction: it reads the
                // primary, never a replica behind.
                let r = match self.reg.get_mut(&server) {
                    None => Registration::Unknown,
                    Some(row) if !row.app => Registration::WrongRole,
                    Some(row) if row.epoch != epoch => {
                        Registration::StaleEpoch { current: row.epoch }
                    }
                    Some(row) => {
                        row.state = RegState::Up;
                        row.exchange = Some(me);
                        row.attach_epoch += 1;
                        Registration::Accepted {
                            attach_epoch: row.attach_epoch,
                        }
                    }
                };
                if matches!(r, Registration::Accepted { .. }) {
                    self.exs[x].rejoining.remove(&server);
                }
                Answer::Registration(Ok(r))
            }
            Query::MarkDown {
                server,
                epoch,
                attach_epoch,
            } => {
                if failing {
                    return Answer::MarkedDown(Err(fail()));
                }
                // As `Registry::mark_down_attached` / `mark_down_from`.
                let mut applied = false;
                if let Some(row) = self.reg.get_mut(&server)
                    && row.epoch == epoch
                    && match attach_epoch {
                        Some(a) => row.attach_epoch == a,
                        None => row.exchange == Some(me),
                    }
                {
                    row.state = RegState::Down;
                    applied = true;
                    self.downs.push((server, self.now));
                    self.spurious_mark_down(x, server, epoch);
                }
                Answer::MarkedDown(Ok(applied))
            }
            Query::Exchanges => {
                if failing {
                    return Answer::Exchanges(Err(fail()));
                }
                let table = if self.reg_mode == RegMode::Stale {
                    &self.reg_stale
                } else {
                    &self.reg
                };
                Answer::Exchanges(Ok(table
                    .iter()
                    .filter(|(_, r)| !r.app)
                    .map(|(id, r)| exchange::ExchangeRow {
                        id: *id,
                        epoch: r.epoch,
                        up: r.state == RegState::Up,
                        address: r.address.clone(),
                    })
                    .collect()))
            }
            Query::AppServers => {
                if failing {
                    return Answer::AppServers(Err(fail()));
                }
                if self.reg_mode == RegMode::Stale {
                    let rows = rows_of(&self.reg_stale);
                    return Answer::AppServers(Ok(rows));
                }
                Answer::AppServers(Ok(rows_of(&self.reg)))
            }
            Query::Touch(_) => {
                if failing {
                    return Answer::Done(Err(fail()));
                }
                self.last_seen.insert(me, self.now);
                Answer::Done(Ok(()))
            }
            Query::RecordLinks { peers, epoch, seq } => {
                if failing {
                    return Answer::Done(Err(fail()));
                }
                // Fenced like the real table: a late recording does not
                // undo a newer one.
                let newer = self
                    .recorded_links
                    .get(&me)
                    .is_none_or(|(version, _)| *version < (epoch, seq));
                if newer {
                    self.recorded_links.insert(me, ((epoch, seq), peers));
                }
                Answer::Done(Ok(()))
            }
        }
    }

    pub(super) fn exchange_rows(&mut self) -> Result<Vec<ExchangeRow>, RegistryFailure> {
        if self.reg_mode == RegMode::Failing && self.rng.chance(0.7) {
            return Err(RegistryFailure("registry unavailable (simulated)".into()));
        }
        let table = if self.reg_mode == RegMode::Stale {
            &self.reg_stale
        } else {
            &self.reg
        };
        Ok(table
            .iter()
            .filter(|(_, r)| !r.app)
            .map(|(id, r)| ExchangeRow {
                id: *id,
                address: r.address.clone(),
                up: r.state == RegState::Up
                    && self
                        .last_seen
                        .get(id)
                        .is_some_and(|t| self.now < *t + EXCHANGE_STALE),
                attached: table
                    .values()
                    .filter(|a| a.app && a.state == RegState::Up && a.exchange == Some(*id))
                    .count() as u64,
            })
            .collect())
    }
}

/// The app servers of a copy of the table, as the exchange core reads them.
pub(super) fn rows_of(table: &BTreeMap<ServerId, RegRow>) -> Vec<AppServerRow> {
    table
        .iter()
        .filter(|(_, r)| r.app)
        .map(|(id, r)| AppServerRow {
            id: *id,
            epoch: r.epoch,
            exchange: r.exchange,
            attach_epoch: r.attach_epoch,
            down: r.state == RegState::Down,
        })
        .collect()
}
