// How a front-end team uses the package, type-checked by `tsc --noEmit -p
// test/types` (tests/js/test_package.py). The @ts-expect-error lines are the
// misuses the types must refuse: tsc fails if one is accepted.

import Tidings, {
  type Member,
  type Presence,
  type Publication,
  type State,
  type SubscribeAck,
  TidingsError,
  compareOffsets,
  isValidTopic,
} from 'tidings-client';
import { Tidings as Named } from 'tidings-client';

interface Order {
  id: number;
  status: 'new' | 'shipped';
}

const tidings: Named = new Tidings({
  url: 'https://tidings.example.com',
  token: () => 'a.jwt.token',
  transport: 'websocket',
  ackTimeout: 10_000,
  io: { reconnectionDelayMax: 10_000 },
});

tidings.on('state', (state: State) => console.log(state)).on('gap', ({ topic }) => resync(topic));
tidings.on('recovered', ({ topic, count }) => console.log(topic, count.toFixed()));
tidings.on('error', ({ topic, error }) => console.log(topic ?? 'connection', error));
tidings.on('join', (member: Member) => console.log(member.sub ?? 'anonymous', member.client));
tidings.on('leave', ({ topic }) => console.log(topic));

async function follow(topic: string): Promise<void> {
  const ack: SubscribeAck<Order> = await tidings.subscribe<Order>(
    topic,
    (publications: Publication<Order>[], { recovered }) => {
      for (const p of publications) console.log(p.offset, p.data.status, recovered);
    },
    { since: '1700000000000-0' },
  );
  if (ack.ok) {
    console.log(ack.offset, ack.publications.length);
  } else {
    console.log(ack.error);
  }
  const last: string | null = tidings.offset(topic);
  console.log(last, tidings.topics().join(','), tidings.state, tidings.transport);
  await tidings.unsubscribe(topic);
}

async function who(topic: string): Promise<number> {
  try {
    const presence: Presence = await tidings.presence(topic, { timeout: 2000 });
    const stats = await tidings.presenceStats(topic);
    return presence.users.length + stats.users;
  } catch (error) {
    if (error instanceof TidingsError && error.code === 'presence_off') return 0;
    throw error;
  }
}

function resync(topic: string): void {
  if (isValidTopic(topic)) console.log(compareOffsets('1-0', tidings.offset(topic)));
}

const sse = new Tidings({ transport: 'sse', url: 'https://tidings.example.com', ssePath: '/sse' });
sse.close();

// @ts-expect-error: not a transport
new Tidings({ transport: 'carrier-pigeon' });
// @ts-expect-error: not an event of the client
tidings.on('publication', () => {});
// @ts-expect-error: a state is a string, not a number
tidings.on('state', (state: number) => state);
// @ts-expect-error: the handler is required
tidings.subscribe('orders.42');
// @ts-expect-error: since is an offset string
tidings.subscribe('orders.42', () => {}, { since: 42 });
// @ts-expect-error: presence answers a Promise, not the counts
const clients: number = tidings.presence('orders.42').clients;

void follow('orders.42');
void who('orders.42');
void clients;
